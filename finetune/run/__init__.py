"""The run directory, read and written here only: its layout and files (``directory``), its
checkpoint folder (``checkpoints``), loading a finished run (``load``), listing runs (``listing``)
and evaluating one (``evaluate``)."""
