"""aggregate stage of the probewire agent."""
