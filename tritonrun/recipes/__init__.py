"""The recipes, one module each (tritonrun/recipes/base.py says what a recipe declares). The registry maps the
--recipe names to them; adding a recipe is a new module and one line here.

  gpt2            llm.c's GPT-2 124M                                   recipes/gpt2.py
  speedrun        modded-nanogpt 2024-12-17 (#17), packed, windowed     recipes/modded_nanogpt_2024_12_17.py
  speedrun-dense  modded-nanogpt 2024-11-10 (#11), dense T = 1024       recipes/modded_nanogpt_2024_11_10.py
  record89        modded-nanogpt 2026-07-17 (#89), staged, FP8 MLPs      recipes/modded_nanogpt_2026_07_17.py
"""
from __future__ import annotations

from tritonrun.recipes import gpt2, modded_nanogpt_2024_11_10, modded_nanogpt_2024_12_17, modded_nanogpt_2026_07_17
from tritonrun.recipes.base import Recipe, Schedule

RECIPES: dict[str, Recipe] = {r.name: r for r in (gpt2.RECIPE, modded_nanogpt_2024_12_17.RECIPE,
                                                  modded_nanogpt_2024_11_10.RECIPE, modded_nanogpt_2026_07_17.RECIPE)}


def get_recipe(name: str) -> Recipe:
    """The recipe of a --recipe name (a run config's `recipe`)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}: choose from {', '.join(RECIPES)}") from None


def recipe_of_model_kind(kind: str) -> Recipe:
    """The recipe whose checkpoints carry "model_kind" `kind` (a checkpoint trains on under it)."""
    return next(r for r in RECIPES.values() if r.model_kind == kind)


def recipe_taking_weights(scheme: str) -> Recipe | None:
    """The recipe that trains --init-from weights of a foreign format (hf:, llmc:), None for ckpt: (its kind says)."""
    return next((r for r in RECIPES.values() if scheme != "ckpt" and scheme in r.init_sources), None)


__all__ = ["RECIPES", "Recipe", "Schedule", "get_recipe", "recipe_of_model_kind",
           "recipe_taking_weights"]
