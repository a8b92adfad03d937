"""The device agent and what only a device needs: its config, round state, bundle fetch, local DP."""
