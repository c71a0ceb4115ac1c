"""The DAPO algorithm: rewards, advantages, dynamic sampling, policy loss and the update step."""
