"""Using a trained model: opening a run (base + adapter, unmerged) or any model directory or hub id
(``load``), formatting prompts the way the run's task trained (``prompts``), the task's metric
(``evaluate``), batched generation (``finetune generate``) and an interactive chat (``chat``)."""
