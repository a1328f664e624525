"""Checkpoint input and output: lazy readers, atomic sharded writer, model card."""
