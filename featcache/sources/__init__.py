"""Dataset readers and what they share: images, tweet text, augmented image views."""
