"""Training the learned precision controller ("Don't Waste Bits!"), issue #5: not implemented yet."""
