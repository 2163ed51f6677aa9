"""Base models: loading models and tokenizers (``load``, ``tokenizer``, ``gguf``), where they run
(``device``), the causal-LM loss (``loss``) and greedy generation (``generate``)."""
