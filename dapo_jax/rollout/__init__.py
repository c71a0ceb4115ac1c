"""Rollouts: a JetStream engine for the Qwen model and a continuous-batching group sampler."""
