"""The numpy simulation core (no gymnasium import): channel, costs, deviation estimate, batched simulator."""
