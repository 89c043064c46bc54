//! Sandbox traffic gateway: routes envd/interpreter/user-port requests to sandbox agents.
