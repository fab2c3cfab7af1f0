"""Run folders: their layout (:mod:`.layout`), checkpoint files (:mod:`.checkpoint`) and the lock
of the run writing into one (:mod:`.lock`). Read by the trainer, evaluation, export and the command
line alike; it imports none of them."""
from .layout import (CLASSES, CONFIG, METRICS, RUN_ENTRIES, TENSORBOARD, branch_folder, changes, claim, describe,
                     finished, load_run, move_aside, newest, read_recipe, resume_into, run_dir, same_or_inside,
                     write_recipe)

__all__ = ["CLASSES", "CONFIG", "METRICS", "RUN_ENTRIES", "TENSORBOARD", "branch_folder", "changes", "claim", "describe",
           "finished", "load_run", "move_aside", "newest", "read_recipe", "resume_into", "run_dir", "same_or_inside",
           "write_recipe"]
