//! Linux sandboxes: namespaces, user namespace mapping, overlay root, cgroups v1/v2, spawn/kill/adopt.
