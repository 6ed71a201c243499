"""The agent console: server-rendered pages at ``/console`` over the agent service layer."""
