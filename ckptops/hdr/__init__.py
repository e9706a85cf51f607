"""Harm Direction Removal: plan (align the three checkpoints), select (exact streaming top-k
threshold), apply (theta_t - scale * mask * tau, chunk by chunk), and the sanitize orchestration."""
