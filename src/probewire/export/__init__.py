"""export stage of the probewire agent."""
