"""Non-network baselines (Task 1 PCA / NMF + linear classifier)."""
