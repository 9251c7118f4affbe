"""Everything a client touches: the WebSocket gateway, sessions, fan-out, the room cache."""
