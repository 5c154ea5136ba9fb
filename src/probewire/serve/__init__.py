"""serve stage of the probewire agent."""
