"""Entry points: each module is runnable with `ray job submit -- python jobs/<name>.py`."""
