"""Tools that write, list and fetch recipes, for the user's side of a run rather than the method: `usp init`
(init.py: scan an image tree, write recipes that name a shipped recipe as `base:`), `usp list` (listing.py: the
registered models, latent spaces and shipped recipes) and `usp fetch` (fetch.py: download the hub assets recipes
name, for an offline machine).

Not `usp/recipes`: that is where an installed wheel keeps the shipped recipes themselves (`usp.config.recipes_dir`).
May import: `usp.config`, `usp.data`, `usp.latent`, `usp.models`, `usp.evaluate` (the Inception weights' name);
never training, sampling, the demo or the CLI.
"""
