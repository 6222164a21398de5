-- wrk script: POST a small OpenAI chat completion with a bearer token; print one JSON line.
--   wrk -t1 -c64 -d10s -s bench/wrk.lua http://127.0.0.1:PORT/v1/chat/completions -- TOKEN
-- The last stdout line starting with "WRKJSON " holds requests, duration, errors and latency
-- percentiles in microseconds (wrk's own histogram, closed loop).

local token = "bench-vk"

function init(args)
  if args[1] ~= nil and args[1] ~= "" then
    token = args[1]
  end
  wrk.method = "POST"
  wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],'
    .. '"max_tokens":16}'
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"bytes":%d', summary.bytes),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"lat_mean_us":%.1f', latency.mean),
    string.format('"lat_stdev_us":%.1f', latency.stdev),
    string.format('"lat_max_us":%d', latency.max),
  }
  for _, p in ipairs({50, 75, 90, 99, 99.9}) do
    parts[#parts + 1] = string.format('"p%s_us":%d', tostring(p):gsub("%.", "_"), latency:percentile(p))
  end
  io.write("WRKJSON {" .. table.concat(parts, ",") .. "}\n")
end
