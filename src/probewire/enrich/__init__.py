"""enrich stage of the probewire agent."""
