"""finetune: config-driven fine-tuning of causal language models.

Importing the package is cheap on purpose: nothing here pulls in torch or transformers.
"""

__version__ = "0.1.0"
