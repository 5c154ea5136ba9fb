"""collect stage of the probewire agent."""
