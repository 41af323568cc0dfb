"""What is measured on a trained network: evaluation and energy, robustness to perturbed observations,
ANN-to-SNN conversion, NIR export for neuromorphic hardware, and the reports drawn from run files."""
