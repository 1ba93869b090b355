"""Linux plumbing shared by the agent and the host service, knowing neither."""
