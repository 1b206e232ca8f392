"""Data pipeline: offline GPT-2 tokenizer, llm.c token shards, batch loader and the bundled sample corpus."""
