"""Client-side balancer for useapi.net channels."""
