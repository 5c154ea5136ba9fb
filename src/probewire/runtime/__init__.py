"""runtime stage of the probewire agent."""
