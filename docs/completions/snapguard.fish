# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_snapguard_global_optspecs
    string join \n config= listen= upstream= admin= log-format= threads= h/help V/version
end

function __fish_snapguard_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_snapguard_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_snapguard_using_subcommand
    set -l cmd (__fish_snapguard_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c snapguard -n "__fish_snapguard_needs_command" -l config -d 'TOML config file; without one, built-in defaults are used. `check` takes it too, before or after the subcommand' -r -F
complete -c snapguard -n "__fish_snapguard_needs_command" -l listen -d 'Address for proxied traffic [default: 127.0.0.1:8080]' -r
complete -c snapguard -n "__fish_snapguard_needs_command" -l upstream -d 'Upstream base URL, http:// or https:// [default: http://127.0.0.1:8776]' -r
complete -c snapguard -n "__fish_snapguard_needs_command" -l admin -d 'Address of the admin endpoints /healthz, /readyz and /metrics [default: 127.0.0.1:9901]' -r
complete -c snapguard -n "__fish_snapguard_needs_command" -l log-format -d 'Log format: text, or one JSON object a line [default: text]' -r -f -a "text\t''
json\t''"
complete -c snapguard -n "__fish_snapguard_needs_command" -l threads -d 'Worker threads serving traffic; 0 means one per CPU [default: 0]' -r
complete -c snapguard -n "__fish_snapguard_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapguard -n "__fish_snapguard_needs_command" -s V -l version -d 'Print version'
complete -c snapguard -n "__fish_snapguard_needs_command" -f -a "check-config" -d 'Validate a config file: prints `FILE: ok` and exits 0, or exits 64 naming the bad key'
complete -c snapguard -n "__fish_snapguard_needs_command" -f -a "check" -d 'Decide on one request offline, body on stdin: exit 0 if it would be forwarded, 1 if refused'
complete -c snapguard -n "__fish_snapguard_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c snapguard -n "__fish_snapguard_using_subcommand check-config" -s h -l help -d 'Print help'
complete -c snapguard -n "__fish_snapguard_using_subcommand check" -l config -d 'TOML config file whose policy decides [default: the built-in one]; the same as `snapguard --config FILE check`, and wins over it when both are given' -r -F
complete -c snapguard -n "__fish_snapguard_using_subcommand check" -s H -l header -d 'A request header, `Name: value`; may be repeated' -r
complete -c snapguard -n "__fish_snapguard_using_subcommand check" -l format -d 'What to print' -r -f -a "text\t'The forwarded or error body on stdout, a labelled report on stderr'
json\t'One JSON verdict on stdout: decision, route, rule, field, status, body'"
complete -c snapguard -n "__fish_snapguard_using_subcommand check" -l batch -d 'Decide on many requests: one JSON object per stdin line ({"method", "target", "headers": [[name, value]...], "body"}), one JSON verdict per stdout line; exit 0'
complete -c snapguard -n "__fish_snapguard_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapguard -n "__fish_snapguard_using_subcommand help; and not __fish_seen_subcommand_from check-config check help" -f -a "check-config" -d 'Validate a config file: prints `FILE: ok` and exits 0, or exits 64 naming the bad key'
complete -c snapguard -n "__fish_snapguard_using_subcommand help; and not __fish_seen_subcommand_from check-config check help" -f -a "check" -d 'Decide on one request offline, body on stdin: exit 0 if it would be forwarded, 1 if refused'
complete -c snapguard -n "__fish_snapguard_using_subcommand help; and not __fish_seen_subcommand_from check-config check help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
