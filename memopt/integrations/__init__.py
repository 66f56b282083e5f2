"""Training frameworks' callbacks: memopt's measurement inside a Hugging Face ``Trainer`` (``transformers``) or a
Lightning ``Trainer`` (``lightning``). Each imports its framework only when used (optional extras)."""
