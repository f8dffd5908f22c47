"""Update rules. Each is a small class: the trainer hands it tensors, it returns ``(loss, metrics)``."""
