"""The composition root: builds the parts from settings and config and runs them (the
``uws`` CLI, the worker, the embedded dev stack, schedules, metrics). Nothing below imports
from here."""
