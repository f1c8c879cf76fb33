"""Running mitmproxy embedded in costtap: options, CA files, intercepted hosts, start and stop."""
