"""Configuration: the schemas (dataclasses, ``schema``), their composition from the YAML groups in
``conf/`` and shell overrides (``compose``), and every rule about values (``validate``).

Nothing here imports torch: ``finetune config`` and ``--help`` stay fast.
"""
