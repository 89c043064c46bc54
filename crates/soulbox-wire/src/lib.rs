//! Wire formats: E2B REST bodies, envd Connect messages, the Connect envelope codec, host-agent messages.
