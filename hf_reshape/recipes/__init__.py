"""Recipes: convert a model's attention, recover its accuracy (attention transfer + fine-tuning) and measure what
each variant gains in speed and memory and loses in accuracy, against the softmax model on the same schedule.

```python
from hf_reshape.recipes import Recipe, run
recipe = Recipe.load("bert-sst2").with_overrides(Recipe.load("bert-sst2").quick)   # what --quick does
results = run(recipe, "runs/bert-sst2")
```

The command line is ``hf-reshape recipe NAME_OR_FILE --out DIR [--quick] ...`` (see ``hf-reshape recipe -h``).
"""

from .runner import run
from .spec import STAGES, TASKS, DataSpec, PretrainSpec, Recipe, RecipeError, Schedule, VariantEntry

__all__ = ["DataSpec", "PretrainSpec", "Recipe", "RecipeError", "STAGES", "Schedule", "TASKS", "VariantEntry", "run"]
