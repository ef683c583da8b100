"""The 66boss text-signal protocol: WebSocket /entry, the TCP line listener, the group HTTP
API and the upload endpoints."""
