"""Knowledge distillation: losses, teacher outputs, students built from teachers, the trainer."""
