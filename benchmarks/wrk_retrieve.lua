-- wrk script for benchmarks/retrieval.py: closed-loop POST /retrieve, one single-query body per request.
-- Bodies come one JSON document per line from the file given as the first script argument; each connection
-- starts at its own offset so connections do not send the same query at the same moment. On completion it writes
-- one JSON line (requests, duration, latency percentiles in microseconds, errors) for the caller to parse.
local bodies = {}
local next_body = 0

init = function(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  next_body = math.random(#bodies)
end

request = function()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", "/retrieve", {["Content-Type"] = "application/json"}, bodies[next_body])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "socket_errors": %d, ' ..
    '"status_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
