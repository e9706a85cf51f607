"""Checkpoint I/O: find shards and read their safetensors headers (resolve, header), read tensor
bytes into reusable buffers (reader), write new shards header-first (writer), and move a finished
output folder into place (publish)."""
