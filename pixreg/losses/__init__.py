"""Regularizer losses: one module per method, each a functional + nn.Module pair."""
