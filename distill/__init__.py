"""Knowledge-distillation retraining (torch only). Not built yet: tracked by the distillation issue."""
