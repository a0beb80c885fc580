"""Settings: :class:`FinetuneConfig` (every setting, its default and help, declared once), the TOML recipes that
set them (:mod:`~toolkit.config.recipes`; shipped ones in ``recipes/``) and the grammar of the settings that are
more than a number or a name (:mod:`~toolkit.config.choices`)."""

from toolkit.config.recipes import DEFAULT_RECIPE, build_config, load_config, read_recipe
from toolkit.config.settings import AugmentConfig, FinetuneConfig, RecipeError

__all__ = ["DEFAULT_RECIPE", "AugmentConfig", "FinetuneConfig", "RecipeError", "build_config", "load_config",
           "read_recipe"]
