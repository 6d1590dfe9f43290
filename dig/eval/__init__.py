"""Evaluation beside training: the ADM suite (FID, sFID, Inception Score, precision, recall) on image sets in the
ADM `.npz` layout (`dig eval`), and the small FID run during training (`during_training`)."""
