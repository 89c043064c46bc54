//! The in-sandbox agent (PID 1): envd HTTP + Connect RPC over the host-passed unix socket.
