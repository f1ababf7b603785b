-- wrk script for infra/bench/session-upstream.sh ROUTE=cart: `POST /cart/items` (one apple)
-- with each request on the next of the logged-in sessions whose cookies (`name=value`, one a
-- line) are in the file named after `--`: writes to many sessions, few of them to the same
-- session at once (a save racing another on one session is retried, which is not what this
-- measures).
--   wrk -t1 -c16 -d5s -s infra/bench/cart-items.lua http://HOST:PORT -- cookies.txt
local cookies = {}
local next_one = 0
local body = '{"item":"apple","qty":1}'

function init(args)
  local file = assert(io.open(args[1], "r"), "a file of session cookies after --")
  for line in file:lines() do
    if #line > 0 then cookies[#cookies + 1] = line end
  end
  file:close()
  assert(#cookies > 0, "no cookie in " .. args[1])
end

function request()
  next_one = next_one % #cookies + 1
  return wrk.format("POST", "/cart/items", {
    ["Cookie"] = cookies[next_one],
    ["Content-Type"] = "application/json",
  }, body)
end
