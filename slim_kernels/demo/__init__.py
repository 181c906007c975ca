"""The forgetting benchmark's pieces: tasks, the embedded base model, evaluation, fine-tuning."""
