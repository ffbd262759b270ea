"""The numpy simulation core (no gymnasium import): channel, costs, deviation bound, batched simulator."""
