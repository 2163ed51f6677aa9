"""What a run produces for other programs: merged Hugging Face checkpoints (``merge``, written by
``streaming``) and peft adapter directories (``peft_format``)."""
