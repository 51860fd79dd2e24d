"""Explainers: one batched CAM engine (Grad-CAM, Integrated Grad-CAM, Expected Grad-CAM) and GAD."""
