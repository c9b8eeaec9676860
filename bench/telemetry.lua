-- wrk script: each request uploads a new batch (unique sequence) of WINDOWS telemetry windows.
local creds = {}
for line in io.lines(os.getenv("EDGEFLEET_BENCH_CREDS")) do table.insert(creds, line) end
local windows = tonumber(os.getenv("EDGEFLEET_BENCH_WINDOWS") or "10")
-- The published bundle the windows name: the server checks each window against its manifest.
local bundle = os.getenv("EDGEFLEET_BENCH_BUNDLE")
local epoch = os.time()
local counter = 0
local tid = 0
function setup(thread) tid = tid + 1; thread:set("tid", tid) end
local function window(id, hour)
  return '{"device_id":"' .. id .. '","model":"m00","version":"1.2.3","bundle_sha256":"'
    .. bundle .. '","window_start":"2026-03-0' .. (hour % 7 + 1) .. 'T0'
    .. (hour % 10) .. ':00:00+00:00","window_s":3600,"inference_count":12,"error_count":0,'
    .. '"latency":{"relative_accuracy":0.01,"bins":{"-345":5,"-340":7},"count":12,"sum":0.012,'
    .. '"min":0.0009,"max":0.0011},"outputs":[{"name":"label","counts":[6,4,2]}],'
    .. '"inputs":[{"name":"x0","counts":[2,8,2]}]}'
end
function request()
  counter = counter + 1
  local id, cred = creds[(counter * 7 + (tid or 1) * 1301) % #creds + 1]:match("(%S+) (%S+)")
  local parts = {}
  for w = 1, windows do parts[w] = window(id, counter + w) end
  local body = '{"device_id":"' .. id .. '","boot_epoch":' .. epoch .. ',"sequence":'
    .. (counter * 16 + (tid or 0)) .. ',"windows":[' .. table.concat(parts, ",") .. ']}'
  return wrk.format("POST", "/v1/devices/" .. id .. "/telemetry",
    {["Authorization"] = "Bearer " .. cred, ["Content-Type"] = "application/json"}, body)
end
